// Dev-only resources (`/_next/*`, the HMR WebSocket) are refused to other origins unless listed:
// the pod's own hosts are the page's origin here, while the pod's nginx sends Host: localhost.
export default { allowedDevOrigins: ["*.localhost"] };
