"""Run by test_batch.py, alone or under mpirun: sequences of different lengths joining and leaving a batch
(chunked prefills beside decodes, a slot reused by a new sequence), then each sequence again alone in
slot 0; the root saves every sequence's logits both ways to an .npz for the test to compare."""

import sys

import numpy as np

from dmoe.engine import Engine

path, kv_type, out = sys.argv[1], sys.argv[2], sys.argv[3]
engine = Engine.load(path, max_seq_len=64, kv_type=kv_type, parallel=3)
if engine.comm.rank != 0:
    engine.serve_forever()
    sys.exit(0)
rng = np.random.default_rng(0)
vocab = engine.config.vocab_size
seqs = {name: [int(i) for i in rng.integers(0, vocab, n)] for name, n in (("a", 14), ("b", 10), ("c", 11), ("d", 6))}
# Each step: (sequence, slot, how many of its next tokens); a sequence's tokens are fixed in advance, so its
# logits can be compared position by position with a run of the same tokens alone.
SCHEDULE = [
    [("a", 0, 10)],
    [("a", 0, 1), ("b", 1, 5)],
    [("a", 0, 1), ("b", 1, 1), ("c", 2, 4)],  # c's prompt in two chunks
    [("b", 1, 1), ("c", 2, 4), ("a", 0, 1)],
    [("c", 2, 1), ("b", 1, 1), ("a", 0, 1)],
    [("c", 2, 1), ("b", 1, 1)],  # a has left
    [("d", 0, 5), ("c", 2, 1)],  # d takes a's slot
    [("d", 0, 1), ("b", 1, 1)],
]
done = dict.fromkeys(seqs, 0)
batched: dict[str, list[np.ndarray]] = {name: [] for name in seqs}
for step in SCHEDULE:
    batch = [(slot, seqs[name][done[name]:done[name] + n]) for name, slot, n in step]
    if step[0][0] == "d" and done["d"] == 0:
        engine.truncate(0, 0)  # a's tokens leave slot 0
    for (name, _, n), logits in zip(step, engine.step(batch, all_logits=True), strict=True):
        batched[name].append(logits)
        done[name] += n
alone = {}
for name, n in done.items():
    engine.truncate(0)
    alone[name] = engine.forward(seqs[name][:n], all_logits=True)
engine.close()
np.savez(out, **{f"batched_{k}": np.concatenate(v) for k, v in batched.items()}, **{f"alone_{k}": v for k, v in
                                                                                     alone.items()})
