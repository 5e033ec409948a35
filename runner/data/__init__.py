"""Data sets as a DataModule: train/val/test splits plus the loaders the loop needs.

Every factory (digits, synthetic, tensors) returns a DataModule. Training order comes from
ResumableBatchSampler: a permutation seeded by (seed, epoch) and a start position, so a run
resumed in the middle of an epoch sees exactly the batches an unbroken run would.
"""

from runner.data.audio import synthetic_audio
from runner.data.audio_folder import audio_folder
from runner.data.dataset import dataset
from runner.data.digits import digits
from runner.data.hf import hf
from runner.data.image_folder import image_folder
from runner.data.shards import shards
from runner.data.module import DataModule, ResumableBatchSampler, split
from runner.data.ode import ode
from runner.data.synthetic import synthetic
from runner.data.table import table
from runner.data.tensors import tensors

__all__ = ["DataModule", "ResumableBatchSampler", "audio_folder", "digits", "hf", "ode", "split", "synthetic", "synthetic_audio", "table", "tensors"]
