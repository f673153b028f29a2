"""Miners: `miner(embeddings, labels) -> indices_tuple` picks the informative pairs or triplets of a batch for the
loss (pytorch-metric-learning's miners), selected by name from `MINERS`."""

from pytorch_metric_learning import miners as pml_miners

from components.registry import Registry

MINERS = Registry("miner", {
    "multi_similarity": pml_miners.MultiSimilarityMiner,  # pairs that violate the MS margin (epsilon)
    "batch_hard": pml_miners.BatchHardMiner,              # hardest positive and negative of each anchor
    "triplet_margin": pml_miners.TripletMarginMiner,      # triplets within a margin (type_of_triplets)
    "pair_margin": pml_miners.PairMarginMiner,            # positives beyond pos_margin, negatives within neg_margin
})
