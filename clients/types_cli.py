"""`herder types register NAME --input pkg.Msg --output pkg.Msg (--proto-path DIR FILE.proto ... |
--descriptor-set FILE)`: register a task type before any worker serves it.

The contract is built on this side (clients.proto_sources: protoc in-process, or a `buf build -o`
descriptor set) and checked for both messages, so a typo is one line and exit code 2 before
the coordinator is asked; the coordinator's own refusal is one line with its details (exit 1).
In this command `--output` is the output message: give the format before the command
(`herder --output json types register ...`) or with HERDER_OUTPUT.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from herder.clients.client import Client
from herder.clients.proto.v1 import task_pb2
from herder.clients.proto_sources import task_type_from_sources

if TYPE_CHECKING:
    from herder.clients.cli_output import Output

HELP = (
    "register a task type without any worker, from .proto files (compiled in-process with grpcio-tools) or a"
    " descriptor set (`buf build -o FILE`); tasks of the type are accepted and wait until a worker serves it"
)


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="task type, such as images.resize")
    parser.add_argument("--input", dest="input_type", required=True, metavar="MESSAGE", help="input message, pkg.Msg")
    # --output is the global format flag elsewhere; here it names the message, as the issue spells the command.
    parser.add_argument(
        "--output",
        "--output-type",
        dest="output_type",
        required=True,
        metavar="MESSAGE",
        help="output message, pkg.Msg",
    )
    parser.add_argument(
        "protos", nargs="*", metavar="FILE.proto", help="the .proto files defining the messages (imports follow)"
    )
    parser.add_argument(
        "--proto-path",
        "-I",
        dest="proto_paths",
        action="append",
        default=[],
        metavar="DIR",
        help="where imports are looked up, repeatable (default: the current directory)",
    )
    parser.add_argument(
        "--descriptor-set", default="", metavar="FILE", help="a FileDescriptorSet file instead of .proto files"
    )
    parser.add_argument("--description", default="", metavar="TEXT", help="shown by `herder types`")
    parser.add_argument(
        "--force",
        action="store_true",
        help="accept messages incompatible with the registered version (logged; workers of earlier versions"
        " are then refused)",
    )


async def register(client: Client, out: Output, args: argparse.Namespace) -> int:
    """Build, check and register the type; prints it (or JSON with the global --output json)."""
    task_type = task_type_from_sources(
        args.name,
        args.input_type,
        args.output_type,
        protos=args.protos,
        proto_paths=args.proto_paths,
        descriptor_set=args.descriptor_set,
        description=args.description,
    )
    stored = await client.register_task_type(
        task_type.name,
        task_type.input_type,
        task_type.output_type,
        task_type.description,
        descriptors=task_type.descriptors,
        force=args.force,
    )
    files = len(stored.descriptors.file)
    if out.json:
        document = await out.to_dict(_without_descriptors(stored))
        document["descriptor_files"] = files
        print(json.dumps(document, indent=2))
        return 0
    out.console.print(
        f"registered task type [bold]{stored.name}[/] version {stored.version}: input {stored.input_type},"
        f" output {stored.output_type}"
        f" ({files} descriptor file{'s' if files != 1 else ''})"
    )
    return 0


def _without_descriptors(task_type: task_pb2.TaskType) -> task_pb2.TaskType:
    copy = task_pb2.TaskType()
    copy.CopyFrom(task_type)
    copy.ClearField("descriptors")  # bulky; `herder types` leaves them out for the same reason
    return copy


__all__ = ["HELP", "add_register_arguments", "register"]
