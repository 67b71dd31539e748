"""Record llama.cpp's logits for SmolLM2-135M-Instruct (Q4_1 GGUF) on a fixed prompt.

The golden file lets tests/test_gguf_import.py check our GGUF import against an independent
implementation (llama.cpp) without needing llama-cpp-python at test time. Regenerate with

    pip install llama-cpp-python
    python tests/golden/make_smollm2_logits.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

It tokenizes PROMPT with llama.cpp (no BOS: the file says add_bos_token=false), evaluates it with
every position's logits kept, and writes tests/golden/smollm2_q4_1_logits.npz with:
``tokens`` (int32, the prompt ids), ``argmax`` (int32, llama.cpp's top-1 id per position over the
full vocabulary), ``ids`` (int32 [positions, K]: the union of each position's top 64 ids and a
fixed random sample of 1024 vocabulary ids) and ``logits`` (float16, the logits at ``ids``).
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

PROMPT = "Question: which city is the capital of France? Answer: The capital of France is"
TOP_K = 64
SAMPLE = 1024
SEED = 0


def main(gguf_path: str) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=128, logits_all=True, n_threads=2, verbose=False, seed=SEED)
    tokens = llm.tokenize(PROMPT.encode("utf-8"), add_bos=False, special=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    vocab = logits.shape[1]
    sample = np.random.default_rng(SEED).choice(vocab, size=SAMPLE, replace=False)
    ids = []
    for row in logits:
        top = np.argsort(-row)[:TOP_K]
        ids.append(np.concatenate([top, sample[~np.isin(sample, top)]]))
    width = min(len(r) for r in ids)  # rows differ by how many sampled ids fell in the top 64
    ids = np.stack([r[:width] for r in ids]).astype(np.int32)
    out = Path(__file__).with_name("smollm2_q4_1_logits.npz")
    np.savez_compressed(
        out,
        tokens=np.array(tokens, dtype=np.int32),
        argmax=logits.argmax(axis=1).astype(np.int32),
        ids=ids,
        logits=np.take_along_axis(logits, ids, axis=1).astype(np.float16),
        gguf_sha256=np.array(hashlib.sha256(Path(gguf_path).read_bytes()).hexdigest()),
    )
    print(f"{out}: {len(tokens)} positions, top-1 {[llm.detokenize([int(i)]).decode() for i in logits.argmax(1)]}")


if __name__ == "__main__":
    main(sys.argv[1])
