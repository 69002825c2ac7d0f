// Swagger UI for this service. A file rather than an inline script, so the page's
// Content-Security-Policy can forbid inline scripts altogether.
"use strict";
window.ui = SwaggerUIBundle({
  // Relative to the page, so the spec is fetched through whatever proxy served the page.
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  // Swagger UI's default sends the spec's URL to validator.swagger.io for a badge: never.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  // The API key typed into "Authorize" lives in this page only, never in local storage.
  persistAuthorization: false,
  showExtensions: true,
});
