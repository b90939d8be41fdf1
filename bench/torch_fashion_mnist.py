"""Plain PyTorch training loop over Fashion-MNIST: one JSON line with per-epoch seconds."""
import time
import torch
import fm_common as c

a = c.parse("torch")
loader = c.train_data(a)
net = c.model()
opt = c.optimizer(net.parameters())
loss_fn = torch.nn.CrossEntropyLoss()
epochs, final = [], 0.0
for e in range(a.epochs):
    t0 = time.perf_counter()
    total, n = 0.0, 0
    for x, y in loader:
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
        n += 1
    epochs.append(time.perf_counter() - t0)
    final = total / n
c.report({"impl": "torch", "epoch_seconds": epochs, "final_loss": final, "threads": a.threads,
          "adamw": "foreach" if torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults.get("foreach") is not False else "for-loop"})
