"""The goals launch/bench.py checks its training rows against (issue 18's "done when").

Kept apart so that bench.py stays a command line; `bench.goals` is this function.
"""


def goals(results: list[dict]) -> list[str]:
  """Issue 18's goals, checked against these results (only those the run covers)."""
  from launch import bench  # lazy: bench imports this module
  ok = {(r["workload"], r["seq"], r["framework"]): r for r in results
        if r.get("status") == "ok" and r.get("variant") in ("tuned", "peer")}
  anyr = {(r["workload"], r["seq"], r["framework"]): r for r in results
          if r.get("variant") in ("tuned", "peer")}
  out = []

  def ratio(r, wl, seq, fw):
    p = ok.get((wl, seq, fw))
    return r["tokens_per_s"] / p["tokens_per_s"] if p else None

  def show(v, lo, label):
    if label == "MFU":
      return f"MFU {'-' if v is None else f'{100 * v:.1f}%'} (goal >= {100 * lo:.0f}%)"
    return f"{'-' if v is None else f'{v:.2f}'}{label} (goal >= {lo}x)"

  def verdict(text, checks):  # checks: (value or None, minimum, label)
    parts = [show(*c) for c in checks]
    met = all(v is not None and v >= lo for v, lo, _ in checks)
    out.append(f"{text}: {', '.join(parts)}: {'MET' if met else 'not met'}")

  for (wl, seq, fw), r in sorted(ok.items()):
    if fw != "jaxtune":
      continue
    shape, method, data = bench.parse_workload(wl)
    eager, comp = ratio(r, wl, seq, "torch"), ratio(r, wl, seq, "torch_compile")
    mfu = r.get("mfu")
    name = f"{shape.upper()} {bench.METHOD_NAMES[method]}{'' if data == 'synthetic' else ' ' + data}"
    if shape == "1b" and method == "full" and data == "synthetic":
      verdict(f"{name} seq {seq}", [(eager, 1.5, "x eager"), (comp, 1.2, "x compiled"),
                                    (mfu, 0.55, "MFU")])
    if shape == "1b" and method == "lora" and data == "synthetic":
      verdict(f"{name} seq {seq}", [(eager, 2.0, "x eager"), (comp, 1.5, "x compiled")])
    if data == "chat" and method == "full":
      unpacked = ok.get((f"{shape}_{method}_seg", seq, "jaxtune"))
      vs = r["tokens_per_s"] / unpacked["tokens_per_s"] if unpacked else None
      verdict(f"{name} seq {seq}", [(eager, 1.4, "x eager"), (mfu, 0.55, "MFU"),
                                    (vs, 0.95, "x unpacked (seg)")])
    if method == "qlora":
      own = ok.get((f"{shape}_lora", seq, "jaxtune"))
      verdict(f"{name} seq {seq}",
              [(r["tokens_per_s"] / own["tokens_per_s"] if own else None, 0.95, "x own LoRA")])
    if shape == "8b" and seq >= 4096 and r.get("peak_bytes"):
      pr = anyr.get((wl, seq, "torch"), {})
      peer = (f", peer {pr['peak_bytes'] / 2**30:.1f} GiB" if pr.get("peak_bytes")
              else f", peer: {pr.get('status')}")
      gib = r["peak_bytes"] / 2**30
      out.append(f"{name} seq {seq}: peak {gib:.1f} GiB{peer}"
                 + (f" (goal < 16 GiB): {'MET' if gib < 16 else 'not met'}"
                    if method == "qlora" else ""))
  return out
