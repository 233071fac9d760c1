"""Independent checks of attribution graphs (imported by the test modules)."""

import torch

from ct_ray.attribution.replacement import Replacement, Sources
from ct_ray.models.capture import capture


def assert_exact(g, rtol=1e-5):
    """Every feature and logit row: incoming edges + constant terms == the target's value (fp32 tolerance
    relative to the magnitudes summed); error and embedding rows are empty."""
    A = g.adjacency
    nF, nL, N = g.n_features, g.n_logits, g.n_nodes
    err, scale = g.residuals()
    assert torch.all(err <= rtol * scale + 1e-6), f"max violation {float((err - rtol * scale).max())}"
    assert not A[nF : N - nL].any(), "error/embedding nodes must have no incoming edges"


def autograd_rows(model, clt, g, rows):
    """Reference adjacency rows by autograd through the frozen forward (not the hand-written transpose)."""
    tokens = torch.tensor(g.meta["tokens"])
    rep = Replacement(model, clt, capture(model, tokens))
    L, P = rep.L, rep.P
    layer, pos, feat = g.column("layer"), g.column("position"), g.column("feature")
    nF = g.n_features
    out = torch.zeros(len(rows), g.n_nodes)
    for k, r in enumerate(rows):
        acts = [a.clone().requires_grad_(True) for a in rep.acts]
        err = rep.error.clone().requires_grad_(True)
        emb = rep.cache.resid_pre0.clone().requires_grad_(True)
        with torch.enable_grad():
            dec = torch.stack(clt.decode(acts)) - torch.stack([clt.b_dec[l] for l in range(L)])[:, None]
            mids, fin = rep.forward(Sources(emb, dec + rep.mlp_const + err))
            if r < nF:
                l, p, i = int(layer[r]), int(pos[r]), int(feat[r])
                y = rep.read(l, mids[l])[p] @ clt.W_enc[l][i]
            else:
                tok = g.meta["logit_tokens"][r - (g.n_nodes - g.n_logits)]
                lg = rep.logits(fin)[-1]
                y = lg[tok] - lg.mean()
            grads = torch.autograd.grad(y, acts + [err, emb], allow_unused=True)
        gacts, gerr, gemb = grads[:L], grads[L], grads[L + 1]
        ga = torch.stack([torch.zeros_like(a) if x is None else x for a, x in zip(rep.acts, gacts)])
        fl, fp, fi = layer[:nF].long(), pos[:nF].long(), feat[:nF].long()
        out[k, :nF] = ga[fl, fp, fi] * torch.stack(rep.acts)[fl, fp, fi]
        out[k, nF : nF + L * P] = (gerr * rep.error).sum(-1).flatten()
        out[k, nF + L * P : nF + L * P + P] = (gemb * rep.cache.resid_pre0).sum(-1)
    return out
