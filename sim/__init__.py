"""Tandem's cost simulator: compute, memory, bytes and time per training step for every path, for models we run
here and models we cannot (LLaMA-7B/70B), validated against measured runs on a rate-limited network testbed.

    shape.py      a decoder's shapes from a Hugging Face config.json (no weights)
    wire.py       exact wire bytes of a step, by building the protobuf messages the edge and cloud exchange, for
                  every PEFT method's wire pattern (method_setup)
    compute.py    FLOPs, optimizer traffic and kept activations of a block, a PEFT site (LoRA, DoRA, (IA)³),
                  virtual tokens and the LM head
    stepcost.py   what a prediction reports: phases, each side's cost, the step's cost
    costmodel.py  peak memory, bytes, round trips and time per step, per path
    profiles.py   device and link profiles, measured (`here`) or documented with their sources
    calibrate.py  `tandem sim calibrate`: the microbenchmarks behind the `here` profile
    events.py     N edges sharing one cloud: event-driven queueing/batching simulation
    compare.py    what-if tables, saturation N, plots
    testbed.py    network namespaces + veth + tbf links to run real training through
    cli.py        `tandem sim predict|calibrate|compare|testbed`
"""
from sim.costmodel import PATHS, StepCost, Workload, paths_for, predict, predict_all
from sim.profiles import DeviceProfile, LinkProfile, device_profile, link_profile
from sim.shape import ModelShape, load_shape
from sim.wire import WireSetup, dlora_setup, method_setup, step_traffic

__all__ = ["PATHS", "StepCost", "Workload", "paths_for", "predict", "predict_all", "method_setup", "DeviceProfile",
           "LinkProfile",
           "device_profile", "link_profile", "ModelShape", "load_shape", "WireSetup", "dlora_setup",
           "step_traffic"]
