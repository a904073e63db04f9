# Writes tests/data/old_checkpoints/ (run from the repository root with the charloom of the commit named in tests/test_compat.py).
import json
import pathlib
import shutil
import subprocess
import sys

import charloom

out = pathlib.Path("tests/data/old_checkpoints"); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
text = pathlib.Path("../shared/corpora/nietzsche.txt").read_text()[:40000]
pathlib.Path("/tmp/fx/small.txt").write_text(text)
kinds = {
 "lstm": dict(model="lstm", layers=1, hidden=32),
 "gru_word": dict(model="gru", layers=1, hidden=32, tokens="word", vocab_size=300),
 "transformer": dict(model="transformer", layers=1, hidden=32, heads=2),
 "mogrifier": dict(model="mogrifier", layers=1, hidden=24),
 "conv": dict(model="conv", layers=1, hidden=32),
 "book": dict(recipe="book", hidden=32),
}
expect = {}
for name, kw in kinds.items():
    run = pathlib.Path(f"/tmp/fx/{name}"); shutil.rmtree(run, ignore_errors=True)
    m = charloom.train("/tmp/fx/small.txt", out=run, max_steps=30, seed=0, **kw)
    idx = json.loads((run/"checkpoints/index.json").read_text())
    dst = out/name; (dst/"checkpoints").mkdir(parents=True)
    shutil.copytree(run/"checkpoints"/idx["last"], dst/"checkpoints"/idx["last"])
    (dst/"checkpoints/index.json").write_text(json.dumps({"last": idx["last"], "best": idx["last"]}))
    if name != "lstm":  # the weights alone; one checkpoint keeps its training state for the resume test
        ck = dst/"checkpoints"/idx["last"]
        (ck/"training_state.pt").unlink()
        man = json.loads((ck/"manifest.json").read_text())
        del man["files"]["training_state.pt"]
        (ck/"manifest.json").write_text(json.dumps(man, indent=1))
    m = charloom.load(dst)
    e = {}
    for t in (0.0, 0.5, 1.0):
        e[str(t)] = str(m.generate("the ", length=60, temperature=t, seed=7))
    d = m.next_token_distribution("the will to ")
    e["next_probs"] = [round(p, 6) for p in d.probs]
    e["bits"] = round(m.evaluate(text[:3000]).bits_per_char, 6) if hasattr(m.evaluate(text[:3000]), "bits_per_char") else str(m.evaluate(text[:3000]))
    r = subprocess.run([sys.executable, "-m", "charloom", "generate", str(dst), "--prompt", "the ", "--length", "60", "--temperature", "1.0", "--seed", "7"], capture_output=True, text=True)
    e["cli_T1"] = r.stdout
    expect[name] = e
(out/"expected.json").write_text(json.dumps(expect, indent=1, ensure_ascii=False) + "\n")
print(json.dumps(expect, indent=1)[:3000])
