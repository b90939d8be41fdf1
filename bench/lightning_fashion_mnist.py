"""PyTorch Lightning over Fashion-MNIST, configured like Lightning's own parity benchmark:
no progress bar, summary, logger or checkpointing. Epoch time is taken between
on_train_epoch_start and on_train_epoch_end by a callback; fit time is reported too."""
import logging, time, warnings
import torch
import pytorch_lightning as pl
import fm_common as c

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
a = c.parse("lightning")


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = c.model()
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.total, self.n = 0.0, 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        if not a.no_log:
            self.log("train_loss", loss)
        self.total += loss.detach()
        self.n += 1
        return loss

    def configure_optimizers(self):
        return c.optimizer(self.parameters())


class EpochTimer(pl.Callback):
    def __init__(self):
        self.times, self.t0 = [], 0.0

    def on_train_epoch_start(self, trainer, module):
        module.total, module.n = 0.0, 0
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self.t0)


timer = EpochTimer()
m = Module()
trainer = pl.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     callbacks=[timer])
t0 = time.perf_counter()
trainer.fit(m, c.train_data(a))
fit = time.perf_counter() - t0
c.report({"impl": "lightning", "epoch_seconds": timer.times, "fit_seconds": fit,
          "final_loss": float(m.total) / max(m.n, 1), "threads": a.threads, "log": not a.no_log})
