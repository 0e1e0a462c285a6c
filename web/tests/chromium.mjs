// Shared by the browser drivers (chat.mjs, kernels.mjs): the flags that give
// headless Chromium on Linux a (SwiftShader) WebGPU adapter.

/** Chromium's command-line flags; `webgpu` false leaves WebGPU off. */
export function chromiumArgs(webgpu = true) {
  return [
    '--no-sandbox',
    ...(webgpu ? ['--enable-unsafe-webgpu'] : []),
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    '--disable-quic',
  ];
}
