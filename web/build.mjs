// Bundles the page into ct_ray/explorer/static/ (run by `make setup` after `npm ci`): the server has no CDN.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const out = new URL("../ct_ray/explorer/static/", import.meta.url).pathname;
mkdirSync(out, { recursive: true });
await build({ entryPoints: ["src/main.js"], bundle: true, minify: true, format: "iife", target: "es2020",
              outfile: out + "app.js", logLevel: "warning" });
for (const f of ["index.html", "app.css"]) copyFileSync(`src/${f}`, out + f);
console.log(`explorer page built into ${out}`);
