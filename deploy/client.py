"""`moe-serve client`: the gRPC API from the terminal (list models, generate, stream)."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from moe_serve.deploy.config import API_KEY_ENV
from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="call the gRPC API")
    p.add_argument("--address", default="127.0.0.1:9000")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV))
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("models", help="list the served models")
    gen = actions.add_parser("generate", help="generate (streams with --stream)")
    gen.add_argument("--model", required=True)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text prompt")
    source.add_argument("--chat", help="one user message through the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stream", action="store_true")
    p.set_defaults(func=run_client)


def _request(args: argparse.Namespace) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=args.model, max_tokens=args.max_tokens, temperature=args.temperature
    )
    if args.seed is not None:
        request.seed = args.seed
    if args.prompt is not None:
        request.prompt = args.prompt
    else:
        request.chat.messages.append(pb.ChatMessage(role="user", content=args.chat))
    return request


def run_client(args: argparse.Namespace) -> int:
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.MoEServingStub(channel)
        try:
            if args.action == "models":
                for model in stub.ListModels(pb.ListModelsRequest(), metadata=metadata).models:
                    print(
                        f"{model.name}\t{model.architecture}\tmax_model_len="
                        f"{model.max_model_len}\texpert_parallel_size="
                        f"{model.expert_parallel_size}"
                    )
            elif args.stream:
                for message in stub.GenerateStream(_request(args), metadata=metadata):
                    for choice in message.choices:
                        print(choice.text, end="", flush=True)
                print()
            else:
                response = stub.Generate(_request(args), metadata=metadata)
                print(response.choices[0].text)
                usage = response.usage
                print(
                    f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion "
                    f"tokens, finish_reason={response.choices[0].finish_reason}]",
                    file=sys.stderr,
                )
        except grpc.RpcError as exc:
            print(f"moe-serve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
