"""Using a trained model: a gallery index saved with its model fingerprint (``Retriever``),
and export of the network to ONNX / TorchScript with its preprocessing."""

from .export import export_model
from .index import KINDS, IndexFileError
from .retriever import Retriever, SearchResult, read_gallery

__all__ = ["KINDS", "IndexFileError", "Retriever", "SearchResult", "export_model", "read_gallery"]
