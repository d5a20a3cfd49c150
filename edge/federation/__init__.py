"""The edge side of a Tandem federation: the Flower ClientApp (local training through the cloud) and its mods."""
