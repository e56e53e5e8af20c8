"""The full gRPC names of the three services, read from their protos: what each server registers and reports its
readiness under (grpc.health.v1), and what clients, the launcher and span names call them by."""

from __future__ import annotations

from internvl.gateway.v1 import gateway_pb2
from internvl.llm.v1 import llm_pb2
from internvl.vision.v1 import vision_pb2

VISION_SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name  # internvl.vision.v1.VisionService
LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name  # internvl.llm.v1.LLMService
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name  # internvl.gateway.v1.ChatService
# By the `internvl-serve` command that serves each.
SERVICE_BY_COMMAND = {"vision": VISION_SERVICE, "llm": LLM_SERVICE, "gateway": GATEWAY_SERVICE}
