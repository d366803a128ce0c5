"""fused_bnlstm: a batch-normalized LSTM (Cooijmans et al., ICLR 2017) for PyTorch, fused and fast."""

from fused_bnlstm.distributed import convert_sync_bnlstm
from fused_bnlstm.modules import BNLSTM, BNLSTMCell, PopulationStatisticsWarning
from fused_bnlstm.ops import bnlstm_layer
from fused_bnlstm.utils import update_population_statistics

__all__ = ["BNLSTM", "BNLSTMCell", "bnlstm_layer", "convert_sync_bnlstm",
           "PopulationStatisticsWarning", "update_population_statistics"]
__version__ = "0.1.0"
