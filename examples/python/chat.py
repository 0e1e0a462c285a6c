#!/usr/bin/env python3
"""A chat with a memory model from Python, through memlayer's C ABI (ctypes).

    python3 examples/python/chat.py --lib target/release/libmemlayer_capi.so \\
        --model models/demo-pkm --budget 25 --prompt "The company that employs Zovom Tudeind is"

Prints the prompt and its streamed answer (to the end of the line), then the
paging counters on stderr. The structs mirror include/memlayer.h.
"""

import argparse
import ctypes as C
import sys


class OpenOptions(C.Structure):
    _fields_ = [("bank", C.c_char_p), ("budget_bytes", C.c_uint64), ("budget_percent", C.c_double),
                ("backend", C.c_uint32), ("fetch_threads", C.c_uint32)]


class Sampling(C.Structure):
    _fields_ = [("max_tokens", C.c_uint32), ("temperature", C.c_float), ("top_p", C.c_float),
                ("seed", C.c_uint64), ("stop", C.c_char_p)]


class Result(C.Structure):
    _fields_ = [("prompt_tokens", C.c_uint32), ("tokens", C.c_uint32),
                ("first_token_seconds", C.c_double), ("seconds", C.c_double),
                ("stopped_by_caller", C.c_uint32)]


class Stats(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in (
        "budget_bytes", "resident_bytes", "resident_pages", "bank_pages", "pages_streamed",
        "bytes_streamed", "value_hits", "value_misses", "block_requests", "block_hits")] + [
        ("hit_rate", C.c_double), ("fetch_seconds", C.c_double)]


TOKEN_CALLBACK = C.CFUNCTYPE(C.c_int32, C.c_char_p, C.c_size_t, C.c_void_p)


def load(path):
    lib = C.CDLL(path)
    lib.memlayer_version_string.restype = C.c_char_p
    lib.memlayer_last_error.restype = C.c_char_p
    lib.memlayer_open_options_default.restype = OpenOptions
    lib.memlayer_sampling_default.restype = Sampling
    lib.memlayer_open.argtypes = [C.c_char_p, C.POINTER(OpenOptions), C.POINTER(C.c_void_p)]
    lib.memlayer_generate.argtypes = [C.c_void_p, C.c_char_p, C.POINTER(Sampling), TOKEN_CALLBACK,
                                      C.c_void_p, C.POINTER(C.c_void_p), C.POINTER(Result)]
    lib.memlayer_stats.argtypes = [C.c_void_p, C.POINTER(Stats)]
    lib.memlayer_string_free.argtypes = [C.c_void_p]
    lib.memlayer_close.argtypes = [C.c_void_p]
    return lib


def check(lib, status, what):
    if status != 0:
        raise SystemExit(f"chat.py: {what}: {lib.memlayer_last_error().decode()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", type=float, default=25.0)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()

    lib = load(a.lib)
    print(lib.memlayer_version_string().decode(), file=sys.stderr)
    options = lib.memlayer_open_options_default()
    options.budget_percent = a.budget
    model = C.c_void_p()
    check(lib, lib.memlayer_open(a.model.encode(), C.byref(options), C.byref(model)), "open")
    try:
        sampling = lib.memlayer_sampling_default()
        sampling.max_tokens = a.max_tokens
        sampling.stop = b"\n"

        @TOKEN_CALLBACK
        def on_piece(piece, length, _user):
            sys.stdout.write(C.string_at(piece, length).decode("utf-8", "replace"))
            sys.stdout.flush()
            return 0

        text, result = C.c_void_p(), Result()
        sys.stdout.write(a.prompt)
        check(lib, lib.memlayer_generate(model, a.prompt.encode(), C.byref(sampling), on_piece,
                                         None, C.byref(text), C.byref(result)), "generate")
        answer = C.string_at(text).decode()
        lib.memlayer_string_free(text)
        if not answer.endswith("\n"):
            sys.stdout.write("\n")
        stats = Stats()
        check(lib, lib.memlayer_stats(model, C.byref(stats)), "stats")
        print(f"[{result.prompt_tokens} prompt + {result.tokens} tokens] hit rate "
              f"{stats.hit_rate * 100:.1f}% | {stats.resident_pages} pages resident of "
              f"{stats.bank_pages}", file=sys.stderr)
    finally:
        lib.memlayer_close(model)


if __name__ == "__main__":
    main()
