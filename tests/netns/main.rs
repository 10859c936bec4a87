mod api;
mod cni;
mod lifecycle;
mod loss;
mod support;
