"""emulator/ is the offsite-tuning path (Xiao, Lin & Han, 2023): the data owner tunes an adapter through a lossy
emulator of the model.

    build.py        cloud: adapter blocks + uniformly layer-dropped (optionally distilled) middle -> a bundle folder
    bundle.py       the bundle and adapter folders, their manifests and hashes
    transport.py    sealed transport of those folders (zip + privacy.security.seal)
    tune.py         data owner: tune the adapter (whole blocks or LoRA) on local data through the frozen emulator
    plug.py         cloud: plug the adapter into the full model; the paper's table
    onnx_export.py  both models as ONNX, run with onnxruntime
    commands.py     what `tandem offsite keygen|build|tune|plug|infer` each do
    cli.py          their command line
"""
