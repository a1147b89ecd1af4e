"""`llm-appliance generate`: one prompt in, text streamed to the terminal, offline (no daemon)."""

from __future__ import annotations

import argparse
import sys
import time

from appliance.errors import ApplianceError


def add_arguments_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (or raw prompt with --raw); '-' reads stdin")
    parser.add_argument("--model", default="default", help="model dir, .gguf file, or 'default'")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--system", default=None, help="a system message (chat mode)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def run_generate(args: argparse.Namespace) -> int:
    from appliance.engine.llm import engine_config_from_kwargs
    from appliance.engine.llm_engine import EngineCore
    from appliance.engine.sequence import SamplingParams
    from appliance.models.tokenizer import apply_chat_template

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        config = engine_config_from_kwargs(
            args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
            max_model_len=args.max_model_len, enforce_eager=True)
        engine = EngineCore(config)
        tokenizer = engine.tokenizer
        if args.raw or not getattr(tokenizer, "chat_template", None):
            prompt_ids = list(tokenizer.encode(prompt))
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": prompt})
            prompt_ids = apply_chat_template(tokenizer, messages)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=list(args.stop))
        engine.add_request("cli", prompt_ids, params)
    except ApplianceError as exc:
        print(f"llm-appliance generate: {exc.message}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    printed = 0
    finish = None
    num_tokens = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            choice = output.outputs[0]
            sys.stdout.write(choice.text[printed:])
            sys.stdout.flush()
            printed = len(choice.text)
            num_tokens = len(choice.token_ids)
            finish = choice.finish_reason
    sys.stdout.write("\n")
    if args.stats:
        elapsed = time.monotonic() - t0
        print(f"[{len(prompt_ids)} prompt tokens, {num_tokens} output tokens, finish={finish}, "
              f"{num_tokens / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
