"""Run under mpirun by test_distributed.py: every position's logits for a fixed sequence, then a greedy
continuation (arguments 5-8: the all-reduces' comm type, where the output matrix runs, shares or "", who routes);
the root saves
both to an .npz for the test to compare across world sizes, and the last position's logits asked for with
top=5."""

import sys

import numpy as np

from dmoe.engine import Engine

path, moe_split, out, n_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
comm_type = sys.argv[5] if len(sys.argv) > 5 else "f32"
output = sys.argv[6] if len(sys.argv) > 6 else "split"
shares = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] else None
routing = sys.argv[8] if len(sys.argv) > 8 else "root"
engine = Engine.load(path, max_seq_len=128, kv_type="f32", moe_split=moe_split, comm_type=comm_type, output=output,
                     shares=shares, routing=routing)
if engine.comm.rank != 0:
    engine.serve_forever()
    sys.exit(0)
ids = [int(i) for i in np.random.default_rng(0).integers(0, engine.config.vocab_size, 16)]
logits = engine.forward(ids, all_logits=True)
greedy = [int(logits[-1].argmax())]
for _ in range(n_new - 1):
    greedy.append(int(engine.forward([greedy[-1]])[-1].argmax()))
comm_bytes = engine.comm.bytes_sent
engine.reset()
top5 = engine.forward(ids, top=5)[-1]  # only each rank's 5 largest logits cross
engine.close()
np.savez(out, logits=logits, greedy=np.array(greedy), comm_bytes=comm_bytes, top5=top5)
