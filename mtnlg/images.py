"""Container images the components run in; tags follow the package version.

Set ``MTNLG_IMAGE_REGISTRY`` when compiling to use your own registry
(``make -C images push REGISTRY=...`` builds and pushes them).
"""

import os

from mtnlg import __version__

REGISTRY = os.environ.get("MTNLG_IMAGE_REGISTRY", "ghcr.io/mtnlg")

#: extract + tokenize: Beam, SentencePiece, google-cloud-storage, boto3 (images/data/Dockerfile)
DATA_IMAGE = f"{REGISTRY}/mtnlg-data:{__version__}"
#: train, fuse, evaluate: PyTorch (images/train/Dockerfile)
TRAIN_IMAGE = f"{REGISTRY}/mtnlg-train:{__version__}"
