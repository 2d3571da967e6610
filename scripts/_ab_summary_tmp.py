import json, glob, os, collections, sys
out = os.environ["OUT"]
rows = collections.defaultdict(list)
for f in sorted(glob.glob(f"{out}/ab_*.json")):
    side = os.path.basename(f).split("_")[1]
    for r in json.load(open(f)):
        if "ms" in r:
            rows[(r["shape"], r["tokens"], r["lora_rank"])].append((side, round(r["ms"], 3), round(r["step_gib"], 3)))
for key, values in sorted(rows.items()):
    print(*key, *values)
