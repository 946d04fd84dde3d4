"""The gRPC contract (`moe_serving.proto`) and its generated modules."""
