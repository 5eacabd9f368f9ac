"""Train a small CNN on handwritten digits streamed from MongoDB by `mongofeed serve`.

Start the daemon first (``make demo`` does all of it):

    mongofeed load digits --config configs/digits.toml --drop
    mongofeed serve --config configs/digits.toml --workers 8
    python examples/train_digits.py

This script has no database code: the daemon reads, decodes, shuffles and batches.
"""

import argparse
import time

import keras

from mongofeed.consumer import daemon_status
from mongofeed.keras import MongoFeedSequence


def build_model() -> keras.Model:
    return keras.Sequential([
        keras.Input(shape=(8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="the daemon's --bind")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train = MongoFeedSequence(args.endpoint, feed="train")
    val = MongoFeedSequence(args.endpoint, feed="val")

    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
    _, accuracy = model.evaluate(val, verbose=0)
    print(f"validation accuracy: {accuracy:.4f} after {args.epochs} epochs "
          f"({time.perf_counter() - started:.1f} s of training)")

    status = daemon_status(train.consumer.control)
    served = sum(w["batches"] for w in status["workers"])
    docs = sum(w["docs"] for w in status["workers"])
    print(f"the daemon served {served} batches ({docs} documents) with "
          f"{len(status['workers'])} workers, {status['counters']['sessions_opened']} sessions")
    train.close()
    val.close()


if __name__ == "__main__":
    main()
