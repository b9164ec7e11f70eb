"""The table of bench/dapo_demo_ab.sh's two runs: held-out reward (± s.e.) at each evaluation against the
training wall-clock seconds before it (sum of time/step), and each run's step count and last metrics.
Usage: python bench/dapo_demo_table.py OUT_DIR"""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("plain", "dapo"):
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, evals, steps = 0.0, [], [r for r in rows if "time/step" in r]
    by_step = {r["step"]: r for r in steps}
    for r in rows:
        if "eval/reward_mean" in r:
            seconds = sum(by_step[s]["time/step"] for s in by_step if s <= r["step"])
            evals.append(f"step {r['step']:3d} {seconds:5.0f}s {r['eval/reward_mean']:+.3f}±{r['eval/reward_se']:.3f}")
    last = steps[-1]
    extra = {k: round(v, 3) for k, v in last.items() if k.startswith(("dynamic/", "overlong", "collapse/", "gns/"))}
    dyn = [r.get("dynamic/rounds", 1.0) for r in steps]
    print(f"{name}: {len(steps)} steps, mean draws/step {sum(dyn) / len(dyn):.2f}, "
          f"mean truncated {sum(r['truncated_frac'] for r in steps) / len(steps):.3f}, last {extra}")
    for e in evals:
        print("   ", e)
