"""The edge client: private data, the layers that touch tokens and labels, and every trainable weight.

    config.py       EdgeConfig and its nested groups (link, data, LoRA, Kill & Revive, noise, optimiser, evaluation)
    flags.py        CLI flags built from nested dataclasses, and configs built back from them
    link.py         the gRPC channel, the session, one Step stream per step, the retry policy
    remote.py       the cloud segment as one autograd module (DLoRA answers, retries and replays inside it)
    trainer.py      EdgeModel (bottom, cloud stand-in, top), build_edge, train and evaluate on model/training.py
    records.py      StepRecord per step, the run's summary, the TensorBoard scalars
    runs.py         run folders (--resume, --overwrite, config.json) and which adapters fit an edge
    inference.py    a tuned adapter without training: dev scores and text generation, via the cloud or locally
    killrevive.py   DLoRA's Kill & Revive policy
    federation/     the Flower ClientApp (a device of a federation, training through the shared cloud)
"""
