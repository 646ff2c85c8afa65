"""Attribution graphs for Hugging Face models through transcoders, with circuit-tracer's names and definitions."""

from nnsae.circuits.attribution import attribute
from nnsae.circuits.files import create_graph_files
from nnsae.circuits.graph import Graph, GraphConfig, LogitTarget
from nnsae.circuits.intervene import intervene
from nnsae.circuits.load import convert_to_circuit_tracer, load_transcoders, save_transcoders
from nnsae.circuits.prune import compute_graph_scores, prune_graph
from nnsae.circuits.transcoders import CrossLayerTranscoder, SingleLayerTranscoder, TranscoderSet
from nnsae.circuits.viewer import write_viewer

__all__ = ["CrossLayerTranscoder", "Graph", "GraphConfig", "LogitTarget", "SingleLayerTranscoder", "TranscoderSet",
           "attribute", "compute_graph_scores", "convert_to_circuit_tracer", "create_graph_files", "intervene",
           "load_transcoders", "prune_graph", "save_transcoders", "write_viewer"]
