"""Attribution graphs for Hugging Face models through transcoders, with circuit-tracer's names and definitions."""

from nnsae.circuits.attribution import attribute
from nnsae.circuits.files import create_graph_files
from nnsae.circuits.graph import Graph, GraphConfig, LogitTarget
from nnsae.circuits.intervene import intervene
from nnsae.circuits.load import convert_to_circuit_tracer, load_transcoders, save_transcoders
from nnsae.circuits.prune import compute_graph_scores, prune_graph
from nnsae.circuits.transcoders import CrossLayerTranscoder, SingleLayerTranscoder, TranscoderSet
from nnsae.attachment.transcoders import (LayerTranscoder, TranscoderAttachment, attach_transcoders, layer_saes,
                                          splice_transcoders)

__all__ = ["CrossLayerTranscoder", "Graph", "GraphConfig", "LayerTranscoder", "LogitTarget", "SingleLayerTranscoder",
           "TranscoderAttachment", "TranscoderSet", "attach_transcoders", "attribute", "compute_graph_scores",
           "convert_to_circuit_tracer", "create_graph_files", "intervene", "layer_saes", "load_transcoders",
           "prune_graph", "save_transcoders", "splice_transcoders"]
