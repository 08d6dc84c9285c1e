"""The floor: the least a Python grpc.aio external processor can do, for bench/latency.py.

    python bench/trivial_extproc.py --uds /tmp/trivial.sock

Envoy's default processing mode (request headers, then the buffered body: two round trips); on
the headers it sets two headers; on the body it parses the JSON once, rewrites `model` and
answers with the new body and its content-length. No policy, no signals, no metrics, no logs.
The issue's reference figure (about +2 ms p50, about 1,570 req/s) is this shape of processor;
bench/latency.py measures it in the same run as the sidecar, so the two compare on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extproc._pb.envoy.config.core.v3 import base_pb2 as core
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(name: str, value: bytes) -> core.HeaderValueOption:
    return core.HeaderValueOption(header=core.HeaderValue(key=name, raw_value=value), append_action=OVERWRITE)


HEADERS_ANSWER = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(
        response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(
                set_headers=[_header("x-extproc-cluster", b"small"), _header("x-selected-model", b"small")]
            )
        )
    )
)


class Trivial(pb_grpc.ExternalProcessorServicer):
    async def Process(self, requests, context):
        async for message in requests:
            if message.HasField("request_headers"):
                yield HEADERS_ANSWER
            elif message.HasField("request_body"):
                body = orjson.loads(message.request_body.body)
                body["model"] = "llama-3.1-8b-instruct"
                out = orjson.dumps(body)
                yield pb.ProcessingResponse(
                    request_body=pb.BodyResponse(
                        response=pb.CommonResponse(
                            header_mutation=pb.HeaderMutation(
                                set_headers=[_header("content-length", str(len(out)).encode())]
                            ),
                            body_mutation=pb.BodyMutation(body=out),
                        )
                    )
                )


async def serve(uds: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Trivial(), server)
    server.add_insecure_port(f"unix:{uds}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uds", required=True)
    asyncio.run(serve(parser.parse_args().uds))
