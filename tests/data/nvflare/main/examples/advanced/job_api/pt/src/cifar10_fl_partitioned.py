# Copyright (c) 2026, NVIDIA CORPORATION.  All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import torchvision
import torchvision.transforms as transforms
from filelock import FileLock
from net import Net
from torch.utils.data import Subset

# (1) import nvflare client API
import nvflare.client as flare
from nvflare.app_common.app_constant import ModelName
from nvflare.client.tracking import SummaryWriter

# (optional) set a fix place so we don't need to download everytime
CIFAR10_ROOT = "/tmp/nvflare/data/cifar10"
# (optional) We change to use GPU to speed things up.
# if you want to use CPU, change DEVICE="cpu"
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset_path", type=str, default=CIFAR10_ROOT, nargs="?")
    parser.add_argument("--batch_size", type=int, default=4, nargs="?")
    parser.add_argument("--num_workers", type=int, default=1, nargs="?")
    parser.add_argument("--local_epochs", type=int, default=2, nargs="?")
    parser.add_argument("--model_path", type=str, default=f"{CIFAR10_ROOT}/cifar_net.pth", nargs="?")
    parser.add_argument("--data_split_path", type=str, default="", help="Path to data split indices")
    return parser.parse_args()


def load_data_split(split_path, site_name):
    """Load pre-computed data split indices for a site."""
    if not split_path or not os.path.exists(split_path):
        return None

    # Try to load site-specific split file
    site_file = os.path.join(split_path, f"{site_name}.npy")
    if os.path.exists(site_file):
        indices = np.load(site_file)
        print(f"Loaded {len(indices)} training indices for {site_name} from {site_file}")
        return indices
    else:
        print(f"Warning: No data split file found at {site_file}, using full dataset")
        return None


def main():
    # define local parameters
    args = define_parser()

    dataset_path = args.dataset_path
    batch_size = args.batch_size
    num_workers = args.num_workers
    local_epochs = args.local_epochs
    model_path = args.model_path
    data_split_path = args.data_split_path

    # (2) initialize NVFlare client API
    flare.init()
    summary_writer = SummaryWriter()

    client_id = flare.get_site_name()

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    # Use file lock to prevent race condition when multiple sites download simultaneously
    os.makedirs(dataset_path, exist_ok=True)
    lock_file = os.path.join(dataset_path, "download.lock")
    with FileLock(lock_file):
        full_trainset = torchvision.datasets.CIFAR10(root=dataset_path, train=True, download=True, transform=transform)
        testset = torchvision.datasets.CIFAR10(root=dataset_path, train=False, download=True, transform=transform)

    # Load site-specific data partition if available
    train_indices = load_data_split(data_split_path, client_id)
    if train_indices is not None:
        trainset = Subset(full_trainset, train_indices)
        print(f"({client_id}) Using partitioned training data: {len(trainset)} samples")
    else:
        trainset = full_trainset
        print(f"({client_id}) Using full training data: {len(trainset)} samples")

    trainloader = torch.utils.data.DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    testloader = torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    net = Net()
    best_accuracy = 0.0

    # wraps evaluation logic into a method to re-use for
    #       evaluation on both trained and received model
    def evaluate(input_weights):
        net = Net()
        net.load_state_dict(input_weights)
        # (optional) use GPU to speed things up
        net.to(DEVICE)

        correct = 0
        total = 0
        # since we're not training, we don't need to calculate the gradients for our outputs
        with torch.no_grad():
            for data in testloader:
                # (optional) use GPU to speed things up
                images, labels = data[0].to(DEVICE), data[1].to(DEVICE)
                # calculate outputs by running images through the network
                outputs = net(images)
                # the class with the highest energy is what we choose as prediction
                _, predicted = torch.max(outputs.data, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()

        if total == 0:
            raise ValueError("Test loader is empty - cannot compute accuracy. Check data preparation.")
        return 100.0 * correct / total

    # (3) run continuously when launch_once=true
    while flare.is_running():

        # (4) receive FLModel from NVFlare
        input_model = flare.receive()

        # Based on different "task" we will do different things:
        # - for "train" task (flare.is_train()): use the received model to do training and/or evaluation,
        #   then send back updated model and/or evaluation metrics
        # - for "evaluate" task (flare.is_evaluate()): use the received model to do evaluation,
        #   then send back the evaluation metrics
        # - for "submit_model" task (flare.is_submit_model()): send back the local model

        # (5) performing train task on received model
        if flare.is_train():
            print(f"({client_id}) current_round={input_model.current_round}, total_rounds={input_model.total_rounds}")

            # (5.1) loads model from NVFlare
            net.load_state_dict(input_model.params)

            criterion = nn.CrossEntropyLoss()
            optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)

            # (optional) use GPU to speed things up
            net.to(DEVICE)
            # (optional) calculate total steps
            steps = local_epochs * len(trainloader)
            for epoch in range(local_epochs):  # loop over the dataset multiple times

                running_loss = 0.0
                for i, data in enumerate(trainloader, 0):
                    # get the inputs; data is a list of [inputs, labels]
                    # (optional) use GPU to speed things up
                    inputs, labels = data[0].to(DEVICE), data[1].to(DEVICE)

                    # zero the parameter gradients
                    optimizer.zero_grad()

                    # forward + backward + optimize
                    outputs = net(inputs)
                    loss = criterion(outputs, labels)
                    loss.backward()
                    optimizer.step()

                    # print statistics
                    running_loss += loss.item()
                    global_step = input_model.current_round * steps + epoch * len(trainloader) + i
                    summary_writer.add_scalar(tag="train_loss", scalar=loss.item(), global_step=global_step)

            print(f"({client_id}) Finished Training")

            # (5.2) evaluation on local trained model to save best model
            local_accuracy = evaluate(net.state_dict())
            print(f"({client_id}) Evaluating local trained model. Accuracy on the 10000 test images: {local_accuracy}")
            if local_accuracy > best_accuracy:
                best_accuracy = local_accuracy
                torch.save(net.state_dict(), model_path)

            # (5.3) evaluate on received model for model selection
            accuracy = evaluate(input_model.params)
            print(
                f"({client_id}) Evaluating received model for model selection. Accuracy on the 10000 test images: {accuracy}"
            )
            summary_writer.add_scalar(
                tag="global_model_accuracy", scalar=accuracy, global_step=input_model.current_round
            )

            # (5.4) construct trained FL model
            output_model = flare.FLModel(
                params=net.cpu().state_dict(),
                metrics={"accuracy": accuracy},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )

            # (5.5) send model back to NVFlare
            flare.send(output_model)

        # (6) performing evaluate task on received model
        elif flare.is_evaluate():
            print(f"({client_id}) Performing cross-site validation")
            accuracy = evaluate(input_model.params)
            print(f"({client_id}) Cross-site validation accuracy: {accuracy}")
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))

        # (7) performing submit_model task to obtain best local model
        elif flare.is_submit_model():
            print(f"({client_id}) Submitting best local model")
            model_name = input_model.meta["submit_model_name"]
            if model_name == ModelName.BEST_MODEL:
                try:
                    weights = torch.load(model_path)
                    net = Net()
                    net.load_state_dict(weights)
                    flare.send(flare.FLModel(params=net.cpu().state_dict()))
                except Exception as e:
                    raise ValueError("Unable to load best model") from e
            else:
                raise ValueError(f"Unknown model_type: {model_name}")

    summary_writer.flush()


if __name__ == "__main__":
    main()
