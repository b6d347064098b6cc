"""llama.cpp, run in a child process of its own: native code that crashes (a SIGSEGV or SIGILL inside a CPU
kernel) fails the one test that called it, naming the signal, while the rest of the suite goes on.

The functions below run in the child (they import llama_cpp, never torch) and return plain Python and NumPy
values; `in_child` starts a fresh process for one call and hands back what it returned.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from typing import Any, Callable

import numpy as np
import pytest

SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads or state forked into llama.cpp


def _serve_one_call(conn, func: Callable, args: tuple) -> None:
    try:
        conn.send(("ok", func(*args)))
    except BaseException:  # noqa: BLE001 - a Python error in the child is reported to the test, not swallowed
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_child(func: Callable, *args: Any, timeout_s: float = 300) -> Any:
    """`func(*args)` in a fresh process; its result, or a test failure that names how the child ended."""
    parent_end, child_end = SPAWN.Pipe(duplex=False)
    process = SPAWN.Process(target=_serve_one_call, args=(child_end, func, args), daemon=True)
    process.start()
    child_end.close()
    try:
        if parent_end.poll(timeout_s):
            try:
                status, value = parent_end.recv()
            except EOFError:  # the child died before it answered
                status, value = None, None
        else:
            status, value = "timeout", None
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    if status == "ok":
        return value
    if status == "error":
        pytest.fail(f"{func.__name__} raised in the llama.cpp process:\n{value}")
    if status == "timeout":
        pytest.fail(f"{func.__name__} did not answer within {timeout_s:.0f} s in the llama.cpp process")
    code = process.exitcode
    if code is not None and code < 0:
        pytest.fail(f"the llama.cpp process died by signal {signal.Signals(-code).name} in {func.__name__} "
                    "(a crash inside llama.cpp's native code)")
    pytest.fail(f"the llama.cpp process ended with exit code {code} in {func.__name__} before it answered")


def _open(path: str, n_ctx: int = 256):
    import llama_cpp

    # float32 KV cache (llama.cpp keeps it in f16 by default), so that only the weights' dtype differs between files
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=max(n_ctx, 1), logits_all=True, n_threads=2,
                           verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def system_info() -> str:
    """llama.cpp's own account of the instruction sets it was built with."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


def tokenize(path: str, texts: list[str]) -> list[list[int]]:
    """Each text as llama.cpp tokenizes it, BOS first."""
    llm = _open(path)
    return [llm.tokenize(text.encode(), add_bos=True, special=False) for text in texts]


def greedy(path: str, prompts: list[list[int]], steps: int) -> list[tuple[list[int], np.ndarray]]:
    """For each prompt, llama.cpp's greedy tokens (one at a time, through its KV cache) and the logits each was
    chosen from, shape (steps, vocab)."""
    llm = _open(path)
    results = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens, logits = [], []
        for _ in range(steps):
            logits.append(np.array(llm.scores[llm.n_tokens - 1]))
            tokens.append(int(np.argmax(logits[-1])))
            llm.eval([tokens[-1]])
        results.append((tokens, np.stack(logits)))
    return results


def sequence_logits(path: str, ids: list[int]) -> np.ndarray:
    """The logits at every position of `ids`, evaluated as one batch."""
    llm = _open(path)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def completion(path: str, prompt: str, max_tokens: int) -> tuple[int, str, str]:
    """A greedy completion as the README's snippet asks for it (n_ctx=0: the model's own context): the context
    llama.cpp chose, why it stopped, and the text."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=0, n_threads=2, verbose=False)
    choice = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)["choices"][0]
    return llm.n_ctx(), choice["finish_reason"], choice["text"]
