"""`chatforge chat`: a streaming terminal chat with a checkpoint (history, `clear`, `quit`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path


def chat(artifact_dir: Path, prompt: str | None, temperature: float, top_k: int | None, max_tokens: int,
         device: str = "cpu", seed: int = 42, out=None) -> int:
    t0 = time.perf_counter()
    out = out or sys.stdout  # looked up per call, so that a redirected sys.stdout is honoured
    from model.chat.conversation import fit_completion
    from model.chat.engine import Engine
    from model.nn.load import load_model
    from model.chat.streaming import TextStream
    from model.errors import InputError

    model, tok = load_model(artifact_dir, device)
    engine = Engine(model, tok)
    history: list[dict] = []

    def reply(user: str, first: bool, prefix: str = "") -> None:
        # the reply gets what the prompt leaves of the context (older turns are dropped first); a message that
        # cannot fit at all raises InputError before anything is printed, and is not kept in the history
        ids, budget = fit_completion(history + [{"role": "user", "content": user}], tok, model.config.sequence_len, max_tokens)
        history.append({"role": "user", "content": user})
        out.write(prefix)
        stream, text = TextStream(tok), []
        for i, step in enumerate(engine.generate([ids], max_tokens=budget, temperature=temperature, top_k=top_k, seed=seed)):
            if step[0] is None:
                break
            if first and i == 0:
                print(f"[first token after {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
            piece = stream.push(step[0][0])
            text.append(piece)
            out.write(piece)
            out.flush()
        tail = stream.flush()
        out.write(tail + "\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(text) + tail})

    if prompt is not None:
        reply(prompt, first=True)
        return 0
    print("chatforge chat: type a message; `clear` starts over, `quit` (or Ctrl-D) leaves.", file=sys.stderr)
    first = True
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("quit", "exit"):
            return 0
        if line == "clear":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if line:
            try:
                reply(line, first, prefix="bot> ")
            except InputError as e:  # too long for the model: say so, keep chatting
                print(f"chatforge: error: {e}", file=sys.stderr)
                continue
            first = False
