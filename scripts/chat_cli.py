"""
Chat with a checkpoint in the terminal, in one of the compute modes (the flags of scripts.generate).

    python -m scripts.chat_cli --checkpoint PATH --mode auto --show-compute
    python -m scripts.chat_cli --checkpoint PATH --prompt "Why is the sky blue?"   # one turn, then exit

The conversation is rendered with nanochat's special tokens (<|user_start|> ... <|assistant_end|>) and
run from the start each turn; the reply ends at <|assistant_end|> (or <|bos|>) or --max-tokens.
Type 'quit' or 'exit' to leave, 'clear' to start over.
"""
import argparse

from nanochat.common import autocast_context, run_script
from scripts.generate import (add_generation_args, check_generation_args, load_from_args, check_mode, compute_report,
                              stop_token_ids, cut_at_stop)


def main(argv=None, input_fn=input):
    parser = argparse.ArgumentParser(description="Chat with a checkpoint in a compute mode")
    add_generation_args(parser)
    parser.add_argument("--prompt", type=str, default=None, help="ask this one question, print the reply and exit")
    args = parser.parse_args(argv)
    check_generation_args(args)
    if args.prompt is not None and not args.prompt.strip():
        raise SystemExit("--prompt is empty: give a question, or leave --prompt out to chat interactively")

    model, tokenizer, meta = load_from_args(args)
    engine = check_mode(model, args)
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    assistant_start, assistant_end = tokenizer.encode_special("<|assistant_start|>"), tokenizer.encode_special("<|assistant_end|>")
    print(f"{meta.get('model_kind', 'gpt')} model from {meta['checkpoint_dir']} | mode {args.mode}")
    print("Type 'quit' or 'exit' to end, 'clear' to start a new conversation")

    conversation = [bos]
    replies = []
    while True:
        if args.prompt is not None:
            user_input = args.prompt
        else:
            try:
                user_input = input_fn("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print("\nGoodbye!")
                break
        if user_input.lower() in ("quit", "exit"):
            print("Goodbye!")
            break
        if user_input.lower() == "clear":
            conversation = [bos]
            print("Conversation cleared.")
            continue
        if not user_input:
            continue
        conversation += [user_start] + tokenizer.encode(user_input) + [user_end, assistant_start]
        with autocast_context(model.get_device().type):
            res = engine.generate_batch([conversation], args.max_tokens, plan=args.mode,
                                        exit_threshold=args.exit_threshold, expand_threshold=args.expand_threshold,
                                        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                        plan_epsilon=args.plan_epsilon, speculate=args.speculate, draft=args.draft,
                                        stop_tokens=(assistant_end, bos, *stop_token_ids(tokenizer, args.stop)))
        text, n = cut_at_stop(tokenizer, res.tokens[0], args.stop)
        reply = res.tokens[0][:n]
        print(f"\nAssistant: {text}")
        if args.show_compute:
            for line in compute_report(model, res.steps[:max(1, n)], row=0, decode=tokenizer.decode):
                print(line)
            if args.speculate:
                print(engine.spec_stats.summary())
        conversation += reply + [assistant_end]
        replies.append(reply)
        if args.prompt is not None:
            break
    return replies


if __name__ == "__main__":
    run_script(main)
