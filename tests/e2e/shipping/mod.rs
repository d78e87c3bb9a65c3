//! What is shipped and the cluster it runs on: the manifests and their RBAC, the Helm
//! chart, the image, and what only a real API server and controller manager do.

mod chart;
mod cluster;
mod image;
mod manifests;
