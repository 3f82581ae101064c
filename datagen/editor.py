from datagen.editors.base import EditBatch, Editor, EditResult  # noqa: F401
from datagen.editors.pix2pix_zero import Pix2PixZero  # noqa: F401
