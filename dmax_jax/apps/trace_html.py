"""A self-contained HTML page that replays decoding step by step.

For every prompt: its blocks in order, numbered from 1 at the start of the
generation (block 1 holds the first generated token; its leading positions
may still be prompt), and for each block one row per step showing the
block's tokens coloured by status (prompt, still masked, newly decoded,
revised, same as before), the model's confidence as the colour's strength
and, on hover, the token, its id, status and confidence. Inline CSS and a few
lines of inline JS (a "last step only" toggle); no network.
"""

from __future__ import annotations

import html
from typing import Sequence

from dmax_jax.decoding import STATUS
from dmax_jax.apps.records import write_atomic

_LABELS = {"prompt": "prompt", "mask": "masked", "new": "newly decoded", "revised": "revised",
           "same": "decoded earlier, unchanged"}

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em}h2{font-size:1.05em;margin:0 0 .3em}
section.p{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
.meta{color:#666;font-size:.85em;margin-bottom:.4em}
pre{white-space:pre-wrap;background:#f3f3f3;padding:.4em;border-radius:4px;margin:.3em 0;font-size:.85em}
.blk{margin:.6em 0}.blk h3{font-size:.85em;color:#444;margin:.2em 0}
table{border-collapse:collapse}td.s{color:#888;font-size:.75em;padding-right:.6em;white-space:nowrap;vertical-align:top}
.t{display:inline-block;font-family:ui-monospace,monospace;font-size:.8em;white-space:pre;min-width:.7em;
   margin:1px;padding:1px 3px;border-radius:3px;border:1px solid rgba(0,0,0,.08)}
.prompt{background:#e0e0e0;color:#777}.mask{background:#fff;color:#bbb;border:1px dashed #bbb}
.new{background:rgba(40,160,60,var(--a));}.revised{background:rgba(230,120,20,var(--a));}
.same{background:rgba(60,110,220,var(--a));}
.legend .t{margin-right:.3em}.legend span.l{margin-right:1.2em;font-size:.85em}
body.last tr.step{display:none}body.last tr.step.final{display:table-row}
"""

_JS = """
function toggleLast(cb){document.body.classList.toggle('last',cb.checked);}
"""


def _visible(ch: str) -> str:
  """Newline and tab as arrows, other control characters as ``\\xNN`` escapes."""
  if ch == "\n":
    return "\u21b5"
  if ch == "\t":
    return "\u2192"
  return ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1]


def _piece(tokenizer, token_id: int, mask_id: int, cache: dict) -> str:
  if token_id == mask_id:
    return "\u2591"
  if token_id not in cache:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    cache[token_id] = "".join(_visible(ch) for ch in text) or "\u2205"
  return cache[token_id]


def _token_span(piece: str, token_id: int, status: str, confidence: float) -> str:
  alpha = 0.2 + 0.8 * max(0.0, min(1.0, confidence))
  tip = f"{piece!r} id {token_id} | {_LABELS.get(status, status)} | confidence {confidence:.3f}"
  return (f'<span class="t {html.escape(status)}" style="--a:{alpha:.2f}" title="{html.escape(tip)}">'
          f"{html.escape(piece)}</span>")


def _block_rows(steps, tokenizer, mask_id, cache) -> str:
  rows = []
  for i, st in enumerate(steps):
    final = " final" if i == len(steps) - 1 else ""
    spans = "".join(_token_span(_piece(tokenizer, t, mask_id, cache), t, s, c)
                    for t, s, c in zip(st.tokens, st.status, st.confidence))
    rows.append(f'<tr class="step{final}"><td class="s">step {st.step}</td><td>{spans}</td></tr>')
  return "".join(rows)


def _prompt_section(item: dict, tokenizer, mask_id: int, cache: dict) -> str:
  rec = item["record"]
  steps = item["steps"] or []
  blocks: dict[int, list] = {}
  for st in steps:
    blocks.setdefault(st.block, []).append(st)
  parts = [
      f'<section class="p"><h2>id {html.escape(str(rec["id"]))}</h2>',
      f'<div class="meta">{rec["num_tokens"]} tokens, {rec["nfe"]} decoding forwards, TPF {rec["tpf"]:.2f}, '
      f'{html.escape(str(rec.get("strategy", "")))} threshold {rec.get("threshold", "")}, '
      f'{len(steps)} steps over {len(blocks)} blocks</div>',
      f'<details><summary>prompt ({len(item["prompt_ids"])} tokens)</summary><pre>{html.escape(rec["prompt"])}</pre>'
      "</details>",
      f'<div>output:</div><pre>{html.escape(rec["output"])}</pre>',
  ]
  for b, bsteps in blocks.items():
    parts.append(f'<div class="blk"><h3>block {b + 1} ({len(bsteps)} step{"s" if len(bsteps) != 1 else ""})</h3><table>'
                 f"{_block_rows(bsteps, tokenizer, mask_id, cache)}</table></div>")
  parts.append("</section>")
  return "".join(parts)


def render(items: Sequence[dict], tokenizer, mask_id: int, title: str = "dmax_jax decoding trace") -> str:
  """The page for ``items`` ({"record", "prompt_ids", "steps": [TraceStep]}, as runner.run returns them)."""
  cache: dict = {}
  legend = "".join(f'<span class="l"><span class="t {s}" style="--a:0.8">{_LABELS[s]}</span></span>'
                   for s in STATUS)
  body = "".join(_prompt_section(item, tokenizer, mask_id, cache) for item in items)
  return (
      f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
      f"<style>{_CSS}</style><script>{_JS}</script></head><body>"
      f"<h1>{html.escape(title)}</h1>"
      f'<div class="legend">{legend} <span class="l">colour strength = confidence; hover a token for details</span>'
      f'<label><input type="checkbox" onchange="toggleLast(this)"> last step of each block only</label></div>'
      f"{body}</body></html>")


def write(path: str, items: Sequence[dict], tokenizer, mask_id: int, title: str = "dmax_jax decoding trace"):
  """Writes the page (whole or not at all: ``records.write_atomic``)."""
  write_atomic(path, render(items, tokenizer, mask_id, title))
