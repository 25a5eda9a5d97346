"""Querier-aware responder: one responder answers a query by who asks it."""
