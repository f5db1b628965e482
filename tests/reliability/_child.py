"""Work that the crash tests kill with SIGKILL at random moments.

python _child.py transform FEATURES_DIR LOG N
python _child.py model MODEL_PATH
python _child.py flow FEATURES_DIR LOG N      (PREFECT_API_URL must be set)
"""

import sys

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.testing import CountingTransformer, random_samples


class BigModel(TransformerMixin, BaseEstimator):
    """Fitting stores a 16 MB array, so that saving the model takes a while."""

    def __init__(self, seed=0):
        self.seed = seed

    def fit(self, X, y=None):
        self.weights_ = np.random.default_rng(self.seed).normal(size=2_000_000)
        return self

    def transform(self, X):
        return X


def transformer(log):
    return SampleWrapper(CountingTransformer(offset=1.0, stateless=True, log_path=log))


def main():
    mode = sys.argv[1]
    if mode == "transform":
        features, log, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
        samples = random_samples(n, n_features=16, seed=7)
        wrapper = CheckpointWrapper(transformer(log), features_dir=features)
        print("READY", flush=True)
        wrapper.transform(samples)
    elif mode == "model":
        path = sys.argv[2]
        samples = random_samples(4)
        print("READY", flush=True)
        seed = 0
        while True:  # refit and save until killed
            seed += 1
            CheckpointWrapper(SampleWrapper(BigModel(seed=seed)), model_path=path).fit(
                samples
            )
    elif mode == "flow":
        from sklearn.pipeline import Pipeline

        from samplepipe.flows import transform_pipeline

        features, log, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
        samples = random_samples(n, n_features=16, seed=7)
        pipe = Pipeline(
            [("step", CountingTransformer(offset=1.0, stateless=True, log_path=log))]
        )
        print("READY", flush=True)
        transform_pipeline(
            pipe, samples, features_dir=features, model_dir=features, batch_size=250
        )
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
