mod cni;
