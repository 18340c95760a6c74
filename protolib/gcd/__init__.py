"""Generalized category discovery: clustering accuracy, semi-supervised k-means on FAISS, K estimation."""

from protolib.gcd.clustering import KEstimate, KMeansResult, estimate_num_clusters, semi_supervised_kmeans
from protolib.gcd.metrics import cluster_accuracy, gcd_accuracies, hungarian_match, split_cluster_accuracy

__all__ = [
    "KEstimate",
    "KMeansResult",
    "cluster_accuracy",
    "estimate_num_clusters",
    "gcd_accuracies",
    "hungarian_match",
    "semi_supervised_kmeans",
    "split_cluster_accuracy",
]
