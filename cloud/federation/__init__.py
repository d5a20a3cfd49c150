"""The cloud side of a Tandem federation: the Flower ServerApp, its LoRA strategies and SecAgg+ on the Message API."""
