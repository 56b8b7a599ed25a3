export const message = "one";
