"""KL vs fp32 of Q4_0-rounded weights (weights only) on the trained hybrid, by which linears stay fp32."""
import torch, math, sys
from cpm_mobile.exporter.models.loader import load_model
from bench.ggml import round_like_ggml
from pathlib import Path
torch.set_num_threads(2)
model, ck = load_model(Path.home() / '.cache/cpm-mobile/qwen35-hybrid24', max_seq_len=256)
from tokenizers import Tokenizer
tok = Tokenizer.from_file(str(Path.home() / '.cache/cpm-mobile/qwen35-hybrid24/tokenizer.json'))
text = open('/work/main/exporter/embedded/heldout.txt').read()
ids = tok.encode(text).ids
windows = [ids[i*256:(i+1)*256] for i in range(8)]
def logits(m):
    out = []
    with torch.no_grad():
        for w in windows:
            m.reset_cache(); out.append(m(torch.tensor([w]), torch.tensor([0]))[0])
    return torch.cat(out)
ref = logits(model).log_softmax(-1)
names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and n != 'lm_head']
def kl_with(kept, kind='Q4_0'):
    import copy
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n in names:
            if any(k in n for k in kept): continue
            w = params[n + '.weight']; w.copy_(round_like_ggml(w, kind))
    lp = logits(m).log_softmax(-1)
    return (ref.exp() * (ref - lp)).sum(-1).mean().item()
for kept in [(), ('in_proj_a', 'in_proj_b'), ('in_proj_a', 'in_proj_b', 'in_proj_z'), ('linear_attn',), ('self_attn',), ('mlp',)]:
    print(kept, f"{kl_with(kept):.3e}", flush=True)
