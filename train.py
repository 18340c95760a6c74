"""Train a protolib model: ``python train.py experiment=protopnet_digits`` (see conf/ and the README)."""

from protolib.cli.train import main

if __name__ == "__main__":
    main()
