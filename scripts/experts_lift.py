"""Domain specialization of an experts entry in one number, for scripts/results-experts-l6.sh.

For each expert E with routed tokens: lift(E) = max over domains d of (N_E(d) / N_E) / (N(d) / N),
how much more of E's tokens come from its main domain than that domain's share of all tokens
(1 = no specialization). Prints the token-weighted mean lift and the share of experts with lift ≥ 1.5.

    python scripts/experts_lift.py STORE NAME     (needs pyarrow: the venv of benches/reference/setup-ct-env.sh)
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.ipc as ipc

store, name = Path(sys.argv[1]), sys.argv[2]
entry = json.loads((store / "manifest.json").read_text())["experts"][name]
if len(entry["domains"]) < 2:
    print("undefined (one domain)")
    sys.exit(0)
total = sum(entry["domain_tokens"])
base = [t / total for t in entry["domain_tokens"]]
(table,) = [f["file"] for f in entry["files"] if f["file"].endswith("domains.arrow")]
rows = ipc.open_file(store / table).read_all().to_pylist()
lift, tokens = defaultdict(float), defaultdict(int)
for r in rows:
    if base[r["domain"]] > 0:
        lift[r["expert"]] = max(lift[r["expert"]], r["share_of_expert"] / base[r["domain"]])
    tokens[r["expert"]] += r["count"]
weight = sum(tokens.values())
mean = sum(lift[e] * tokens[e] for e in lift) / weight
high = sum(1 for e in lift if lift[e] >= 1.5) / len(lift)
print(f"{mean:.2f} ({100 * high:.0f} % of experts ≥ 1.5)")
