"""Chat: talk to a checkpoint from the store (base, mid, sft or rl) through the project's engine, the reply
streamed token by token. The only page that imports torch, and only once a checkpoint is chosen."""
from __future__ import annotations

import threading
import time

import streamlit as st

from dashboards import common, queries
from model.chat.conversation import CHAT_TEMPERATURE, CHAT_TOP_K

ctx = common.context()
st.title("Chat")
if common.empty_state(ctx):
    st.stop()

ckpts = queries.checkpoints(ctx.con)
if ckpts.empty:
    st.info("No checkpoint in the store yet: a run makes one at its `base` stage (then mid, sft and rl). "
            f"Start one with `{common.START_A_RUN}` and come back.", icon=":material/info:")
    st.stop()

keys = list(ckpts["key"])
labels = {k: f"{s} · {k[:12]} · {c:%Y-%m-%d %H:%M}" + (f" · run {r[:8]}" if isinstance(r, str) else "")
          for s, k, c, r in zip(ckpts["stage"], ckpts["key"], ckpts["created"], ckpts["run_id"])}
asked = st.query_params.get("model")
matches = [k for k in keys if asked and k.startswith(asked)]
if asked and not matches:
    st.error(f"No checkpoint {asked!r} in the store `{ctx.store.url}`: pick one below.", icon=":material/search_off:")
key = st.selectbox("checkpoint", keys, index=keys.index(matches[0]) if matches else 0, format_func=labels.get,
                   help="the newest chat model first: rl, then sft, mid and base")
st.query_params["model"] = key[:12]

with st.sidebar:
    st.subheader("sampling")
    temperature = st.slider("temperature", 0.0, 2.0, CHAT_TEMPERATURE, 0.1, help="0 = greedy")
    top_k = st.slider("top-k", 0, 200, CHAT_TOP_K, help="sample from the k most likely tokens; 0 = off")
    max_tokens = st.number_input("max tokens", 1, 4096, 128, help="longest reply in tokens")
    seed = st.number_input("seed", 0, 2**31 - 1, 42, help="the same seed gives the same reply")
    import torch  # here, not at the top: the rest of the page (the checkpoint list, the empty states) needs no torch

    device = st.radio("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), horizontal=True)


@st.cache_resource(max_entries=2, show_spinner="loading the checkpoint…")
def engine(path: str, device: str):
    """The model, its tokenizer and an engine, once per checkpoint and device for all sessions; a lock so that
    two sessions generate one after the other (a CPU has no room for two at once)."""
    from model.chat.engine import Engine
    from model.nn.load import load_model

    model, tok = load_model(path, device)
    return Engine(model, tok), threading.Lock()


def reply(eng, lock, history: list[dict], stats: dict):
    """The assistant's next turn, piece by piece (whole UTF-8 characters), for st.write_stream."""
    from model.chat.conversation import fit_completion
    from model.chat.streaming import TextStream

    ids, budget = fit_completion(history, eng.tok, eng.model.config.sequence_len, int(max_tokens))
    stream, t0 = TextStream(eng.tok), time.perf_counter()
    with lock:
        for step in eng.generate([ids], max_tokens=budget, temperature=temperature, top_k=top_k or None, seed=int(seed)):
            if step[0] is None:
                break
            stats["tokens"] = stats.get("tokens", 0) + 1
            stats.setdefault("first", time.perf_counter() - t0)
            piece = stream.push(step[0][0])
            if piece:
                yield piece
    tail = stream.flush()
    stats["seconds"] = time.perf_counter() - t0
    if tail:
        yield tail


from artifacts.models import resolve_model  # noqa: E402
from model.errors import InputError  # noqa: E402

try:
    path = resolve_model(key, ctx.store)
    eng, lock = engine(str(path), device)
except Exception as e:  # noqa: BLE001 - a corrupt or half-pulled checkpoint: say which and how to fix it
    st.error(f"cannot load checkpoint {key[:12]} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}): "
             "run `chatforge artifacts verify` and recompute it", icon=":material/error:")
    st.stop()
cfg = eng.model.config
st.caption(f"{ckpts.loc[ckpts['key'] == key, 'stage'].iloc[0]} checkpoint · {cfg.n_layer} layers · context "
           f"{cfg.sequence_len} tokens · vocabulary {cfg.vocab_size:,} · on {device}")

history = st.session_state.setdefault(f"chat:{key}", [])
if st.sidebar.button("clear the conversation", disabled=not history):
    history.clear()
for msg in history:
    with st.chat_message(msg["role"]):
        st.markdown(msg["content"])

prompt = st.chat_input("Message the model")
if prompt:
    with st.chat_message("user"):
        st.markdown(prompt)
    stats: dict = {}
    with st.chat_message("assistant"):
        try:
            text = st.write_stream(reply(eng, lock, history + [{"role": "user", "content": prompt}], stats))
        except InputError as e:  # the message alone does not fit the model's context: keep chatting
            st.error(str(e))
        else:
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
            if stats.get("tokens"):
                st.caption(f"{stats['tokens']} tokens · first after {stats['first']:.2f} s · "
                           f"{stats['tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s")
