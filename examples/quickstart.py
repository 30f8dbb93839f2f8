import torch, certlib
from certlib.data import load
d = load("digits", "train"); x, y = torch.tensor(d.x), torch.tensor(d.y)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(300):
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
report = certlib.verify(model, "digits", 0.1)
print(f"sound VRA at eps=0.1: {100 * report.vra:.2f}% (clean {100 * report.clean_accuracy:.2f}%, L_body {report.lipschitz:.4g})")
