from rg_mlx import _blas; print(_blas.active())
import time, mlx.core as mx, numpy as np
import rg_mlx
from benchmarks.bench import memory_bandwidth
print('bw %.1f'%(memory_bandwidth()/1e9))
m = rg_mlx.load_model('/root/.cache/rg_mlx/bench/bench-float32', dtype='float32')
E = m.model.embed_tokens.weight if hasattr(m,'model') else None
print(type(m), [k for k,_ in m.named_modules()][:5])
