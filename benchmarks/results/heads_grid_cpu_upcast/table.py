"""before_after.md from before.json (42a8e4d), after.json (4a60604: low-precision GEMMs in fp32)
and final.json (de01412: and the groups form's backward into buffers), each a run of
benchmarks/heads_grid.py --rounds 15 --out."""
import json

RUNS = ("before", "after", "final")
rows: dict = {}
for name in RUNS:
    for r in json.load(open(f"{name}.json"))["rows"]:
        rows.setdefault((r["dtype"], r["T"], r["hidden"], r["widths"], r["B"]), {})[name] = r


def mark(x: float) -> str:
    return f"{x:.2f}" + (" **miss**" if x > 1.02 else "")


with open("before_after.md", "w") as f:
    f.write("| dtype | T | hidden | widths | B | before | after | final | final: fused / loop / "
            "concat+bmm ms |\n|---|---:|---:|---|---:|---:|---:|---:|---|\n")
    for (dt, T, h, w, B), r in rows.items():
        ms = r["final"]["ms"]
        f.write(f"| {dt} | {T} | {h} | {w} | {B} | "
                + " | ".join(mark(r[n]["ratio"]) for n in RUNS)
                + f" | {ms['fused']:.3f} / {ms['loop']:.3f} / {ms['concat+bmm']:.3f} |\n")
