"""Command line for the frozen-LLM core.

  python -m xfusion_jax.llm generate --prompt="..." [--model=DIR]
      [--max_new_tokens=N] [--temperature=T --top_k=K --top_p=P]
      [--chat=false] [--dtype=bfloat16]
  python -m xfusion_jax.llm convert_gguf --gguf=FILE --out=DIR
  python -m xfusion_jax.llm export --out=DIR [--model=DIR]
      [--max_shard_size=5GB] [--dtype=bfloat16]

Without --model, the cached SmolLM2-135M-Instruct is used (converted once
from the pinned GGUF on PyPI). Flags: `--helpfull`.
"""

from xfusion_jax.llm import cli

if __name__ == "__main__":
  cli.run()
